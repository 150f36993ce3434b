"""bench/tiling.py: the tiled-against-untiled table behind an export's tile size."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("tiling_bench", Path(__file__).resolve().parent.parent / "bench/tiling.py")
tiling_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiling_bench)
import helpers  # noqa: E402


def test_tiling_bench_writes_cost_per_tile_and_overlap(tmp_path, capsys):
    photos = helpers.write_noise_photos(tmp_path / "photos", 2, size=(40, 48))
    helpers.tiny_vae().save_pretrained(tmp_path / "vae")
    tiling_bench.main([str(tmp_path / "vae"), str(photos), "--short-side", "32", "--tiles", "16", "32",
                       "--overlaps", "0.25", "0.5", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out/result.json").read_text())
    assert set(result["summary"]) == {"16/0.25", "16/0.5", "32/0.25", "32/0.5"}
    assert len(result["per_image"]) == 2 and result["per_image"][0]["width"] == 38  # 32x38 -> multiple of 2
    row = result["per_image"][0]  # cost = untiled PSNR - tiled PSNR, per setting
    assert row["tiled"]["16/0.5"]["cost_db"] == row["psnr_untiled"] - row["tiled"]["16/0.5"]["psnr"]
    assert row["tiled"]["16/0.5"]["psnr"] != row["tiled"]["32/0.5"]["psnr"]  # the tile size matters
    assert result["receptive_field"]["pixels"] == 49
    assert "| 16 | 0.25 |" in (tmp_path / "out/table.md").read_text()
    assert "decoder receptive field: 49 px" in capsys.readouterr().out
