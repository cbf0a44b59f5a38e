"""flashmoe.hub"""
