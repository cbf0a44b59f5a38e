"""flashmoe.runtime"""
