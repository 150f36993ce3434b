"""Plain-text presentation of an evaluation report (see :func:`kl_ae.eval.evaluate.evaluate`)."""

from __future__ import annotations

from kl_ae.eval.probe import format_latent


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "-"
    v = metrics[key]
    if v is None:
        return "inf" if key == "psnr" and metrics.get("psnr_infinite") else "n/a"
    return f"{v:.2f}" if key == "psnr" else f"{v:.4f}"


def format_report(report: dict) -> str:
    """A plain-text table of a report from :func:`evaluate`: metric rows, model and baselines
    as columns, then model, throughput, protocol and skipped-image lines."""
    columns = {"model": report["metrics"], **report.get("baselines", {})}
    metric_keys = ["psnr", "ssim"] + [
        k for k in report["metrics"] if k not in ("psnr", "ssim", "psnr_infinite")
    ]
    labels = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS",
              "lpips_random_trunk": "LPIPS (random trunk!)"}
    rows = [["metric", *columns]] + [
        [labels.get(k, k), *(_cell(m, k) for m in columns.values())] for k in metric_keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                  enumerate(zip(row, widths)))
        for row in rows
    ]
    m, t = report["model"], report["throughput"]
    enc, dec = t["encode_images_per_s"], t["decode_images_per_s"]
    lines = [
        f"Reconstruction of {report['num_images']} images from {report['images']}",
        *table,
    ]
    if "lpips_skipped" in report:
        lines.append(f"LPIPS skipped: {report['lpips_skipped']}")
    lines += [
        f"model: f{m['downsampling_factor']} c{m['latent_channels']}, compression "
        f"{m['compression_ratio']:g}x, {m['parameters'] / 1e6:.2f} M parameters",
        f"throughput ({t['device']}, {t['dtype']}, batch {t['batch_size']}): encode "
        f"{enc or 0:.2f} img/s, decode {dec or 0:.2f} img/s over {t['timed_images']} images"
        + (" (first batch excluded as warm-up" if t["warmup_batch_excluded"] else " (with warm-up")
        + (", partial last batch excluded)" if t.get("partial_batch_excluded") else ")"),
        f"protocol: {report['protocol']['text']}",
    ]
    skipped = report.get("skipped") or {}
    lines.append(
        "skipped: " + (", ".join(f"{k}: {v}" for k, v in skipped.items()) if skipped else "none")
    )
    lines += format_latent(report)
    return "\n".join(lines)
