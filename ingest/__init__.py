"""fgm.ingest"""
