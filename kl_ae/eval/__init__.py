"""What an autoencoder is worth: ``kl-ae eval``'s protocol and loop (:mod:`.evaluate`), per-image
metrics (:mod:`.metrics`), the latent report and rFID (:mod:`.probe`, :mod:`.latent`,
:mod:`.fid`), full-size tiled reconstruction (:mod:`.tiling`), grids and the text report
(:mod:`.grids`, :mod:`.report`)."""
