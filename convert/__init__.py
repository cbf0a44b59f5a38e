"""flashmoe.convert"""
