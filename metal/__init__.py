"""flashmoe.metal"""
