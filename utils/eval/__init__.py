"""evaluate.py's metrics: common (image folders, writes, chart), nudity, clip, fid, toy and report."""
