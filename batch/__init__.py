"""flashmoe.batch"""
