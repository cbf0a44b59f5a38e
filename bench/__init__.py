"""flashmoe.bench"""
