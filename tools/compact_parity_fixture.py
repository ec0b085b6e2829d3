#!/usr/bin/env python
"""Make a compact copy of an official parity fixture (format "smca-detr-compact-fixture/1").

    python tools/compact_parity_fixture.py IN.pt OUT.pt [--drop PATTERN ...] [--no-default-drops]

* ``state_dict``: every float tensor that is exactly ``q * 2**e`` with an integer ``q`` in
  [-128, 127] and one integer exponent ``e`` per tensor (the SMCA fixtures' weight recipe) is stored
  as ``{"q": int8 tensor, "e": int}``; the exactness is verified (the rebuilt float32 tensor must be
  bit-identical, and also in float64), otherwise the tensor is kept as it is.
  ``tests/parity_common.load_fixture`` rebuilds the float32 values.
* Entries the tests do not compare are dropped: fnmatch patterns over ``section/key`` (e.g.
  ``inputs/query_embed``, ``intermediates/dec.0.gaussian``); ``DEFAULT_DROPS`` lists the defaults
  with the reason for each. What was dropped is recorded in ``compact.dropped``.

Everything else (config, inputs, outputs, losses, matcher indices, post-processing, provenance)
is copied unchanged. The file is written by ``torch.save`` and its zip members are then re-compressed
with DEFLATE (``torch.load`` reads compressed members; about 8% smaller); ``--no-deflate`` keeps
``torch.save``'s stored members.
"""
import argparse
import fnmatch
import hashlib
import math
import os
import sys
import zipfile
from collections import OrderedDict

import torch

COMPACT_FORMAT = "smca-detr-compact-fixture/1"

# (pattern over "section/key", reason). Patterns only drop what a test rebuilds or does not read.
DEFAULT_DROPS = [
    ("inputs/query_embed", "copy of state_dict query_embed.weight"),
    ("inputs/image_mask", "rebuilt exactly from inputs.image_sizes + padded_image_size by the tests"),
    ("postprocess_float64", "post-processing runs in float32 in smca_detr (not compared)"),
    # SMCA single scale: the four type files share inputs; the type3 copy keeps the encodings and
    # the standard-DETR internals, the others keep only the SMCA-specific ones.
    ("smca_single_type[124]:inputs/pos_embeds", "identical in smca_single_type3 (compared there)"),
    ("smca_single_type[124]:intermediates/dec.0.gaussian",
     "layer 0 Gaussian compared in type3; the last layer's (compared) depends on layer 0's centre"),
    ("smca_single_type3:intermediates/transformer_in.src", "standard DETR input projection"),
    ("smca_single_type3:intermediates/encoder_out", "standard DETR encoder, checked through every later tensor"),
    ("smca_single_type3:intermediates/dec.0.cross_attn_weights", "the last layer's weights are compared"),
    ("smca_single_type3:intermediates/dec.*.cross_attn_out", "checked through hs (= norm(out))"),
    ("smca_single_type3:intermediates/dec.*.out", "hs (compared) is the decoder norm of it"),
    ("smca_single_type3:intermediates_float64/hs", "outputs_float64 (compared) are heads of it"),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantize_exact(t: torch.Tensor):
    """``{"q": int8, "e": int}`` if ``t`` is exactly ``q * 2**e`` (verified), else None."""
    if not t.is_floating_point() or t.dtype != torch.float32 or t.numel() == 0:
        return None
    if not torch.isfinite(t).all():
        return None
    m = float(t.abs().max())
    candidates = [0] if m == 0 else [math.ceil(math.log2(m / 127)) + d for d in (0, 1, -1)]
    t64 = t.double()
    for e in candidates:
        q64 = t64 / (2.0 ** e)
        if not torch.equal(q64, q64.round()) or q64.min() < -128 or q64.max() > 127:
            continue
        q = q64.to(torch.int8)
        back32 = q.to(torch.float32) * (2.0 ** e)
        if torch.equal(back32, t) and torch.equal(q.double() * (2.0 ** e), t64):
            return {"q": q.contiguous(), "e": int(e)}
    return None


def deflate_zip(path):
    """Re-write the zip members of a ``torch.save`` file with DEFLATE (level 9), same order."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    os.replace(tmp, path)


def _matches(case, section, key, patterns):
    name = f"{section}/{key}" if key is not None else section
    for p in patterns:
        scope, _, pat = p.rpartition(":")
        if scope and not fnmatch.fnmatch(case, scope):
            continue
        if fnmatch.fnmatch(name, pat):
            return True
    return False


def compact(fx, case: str, patterns):
    out = OrderedDict()
    dropped, kept_float = [], []
    for section, value in fx.items():
        if section in ("format",):
            continue
        if _matches(case, section, None, patterns):
            dropped.append(section)
            continue
        if section == "state_dict":
            sd = OrderedDict()
            for k, v in value.items():
                qe = quantize_exact(v)
                if qe is None:
                    kept_float.append(k)
                    sd[k] = v
                else:
                    sd[k] = qe
            out[section] = sd
        elif isinstance(value, dict) and section not in ("config", "official", "environment"):
            sub = OrderedDict()
            for k, v in value.items():
                if _matches(case, section, k, patterns):
                    dropped.append(f"{section}/{k}")
                else:
                    sub[k] = v
            out[section] = sub
        else:
            out[section] = value
    out["format"] = COMPACT_FORMAT
    out.move_to_end("format", last=False)
    return out, dropped, kept_float


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--drop", action="append", default=[],
                    help="extra fnmatch pattern over 'section/key' to drop ('case:pattern' limits it to a case)")
    ap.add_argument("--no-default-drops", action="store_true")
    ap.add_argument("--no-deflate", action="store_true", help="keep torch.save's uncompressed zip members")
    args = ap.parse_args(argv)

    fx = torch.load(args.input, map_location="cpu", weights_only=True)
    if fx.get("format") == COMPACT_FORMAT:
        sys.exit(f"{args.input} is already compact")
    case = fx.get("case") or os.path.splitext(os.path.basename(args.input))[0]
    patterns = ([] if args.no_default_drops else [p for p, _ in DEFAULT_DROPS]) + list(args.drop)
    out, dropped, kept_float = compact(fx, case, patterns)
    out["compact"] = {
        "source_file": os.path.basename(args.input),
        "source_sha256": sha256(args.input),
        "source_format": fx.get("format"),
        "dropped": dropped,
        "float_state_dict_keys": kept_float,
        "tool": "tools/compact_parity_fixture.py",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(out, args.output)
    if not args.no_deflate:
        deflate_zip(args.output)
    # round trip: the rebuilt state dict must equal the original bit for bit
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from parity_common import load_fixture  # noqa: E402

    back = load_fixture(args.output)
    assert list(back["state_dict"]) == list(fx["state_dict"])
    assert list(back) == list(out) and torch.equal(back["outputs"]["pred_logits"], fx["outputs"]["pred_logits"])
    for k, v in fx["state_dict"].items():
        assert back["state_dict"][k].dtype == v.dtype and torch.equal(back["state_dict"][k], v), k
    print(f"{args.input} ({os.path.getsize(args.input) / 1e6:.2f} MB) -> {args.output} "
          f"({os.path.getsize(args.output) / 1e6:.2f} MB); int8 tensors: "
          f"{len(fx['state_dict']) - len(kept_float)}/{len(fx['state_dict'])}; dropped: {', '.join(dropped) or '-'}")


if __name__ == "__main__":
    main()
