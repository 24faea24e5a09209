"""vitlab.study"""
