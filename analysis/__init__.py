"""fgm.analysis"""
