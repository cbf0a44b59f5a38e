"""flashmoe.eval"""
