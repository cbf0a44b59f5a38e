"""flashmoe.serve"""
