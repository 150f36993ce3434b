"""Training and evaluation images: where they come from (:mod:`.sources`: folders, webdataset
shards, the built-in photographs), how one is decoded and cropped (:mod:`.images`), the training
loaders with their exact-resume position and resolution schedule (:mod:`.loaders`), and packing a
folder into shards (:mod:`.shards`)."""
