"""vitlab.bench"""
