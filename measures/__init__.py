"""fgm.measures"""
