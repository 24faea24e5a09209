"""vitlab.analysis"""
