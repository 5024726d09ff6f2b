"""Offsite copies: completed restore points uploaded to an S3 bucket with Object Lock.

A copy is a self-describing, portable artifact: the point's qcow2 file (a
full image, or an overlay whose backing file is its base copy's
``<point-id>.qcow2`` in the same folder), its chunk digests recorded at backup
time (the ``.digests`` sidecar, :mod:`sendense_nbd.copy.digests`) and a JSON
manifest naming the chain, sizes and checksums (:mod:`.manifest`). Uploads are
multipart with an MD5 per part, resumable and bounded in memory
(:mod:`.upload`); every object of a chain is locked as a unit
(:mod:`.chains`); a copy is served straight from the bucket through ranged
GETs with a bounded cache (:mod:`.remote`), or downloaded and verified
(:mod:`.restore`). The bucket and its errors are :mod:`.s3`'s.

The calls here are blocking (boto3); the hub runs them in threads.
"""
