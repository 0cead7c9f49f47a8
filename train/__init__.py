"""fgm.train"""
