"""Training and evaluation images: where they come from (:mod:`.sources`: folders, webdataset
shards, the built-in photographs), how one is decoded and cropped (:mod:`.images`), the training
loaders with their resolution schedule (:mod:`.loaders`), packing a folder into shards and the
exact-resume position of a shard stream (:mod:`.shards`), and synthetic dead-leaves images
(:mod:`.synthetic`)."""
