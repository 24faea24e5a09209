"""vitlab.data"""
