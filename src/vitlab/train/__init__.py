"""vitlab.train"""
