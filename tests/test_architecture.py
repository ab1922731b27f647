"""The architecture as checked facts (docs/architecture.md): dependency rules, the
package layout the wheel ships, and the tables that must agree across layers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lmcache_pd.kernels import PagedFormat, gather, scatter
from lmcache_pd.kernels.geometry import TORCH_DTYPES, KVShape
from lmcache_pd.layout import DTYPE_SIZES, PRESETS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _source_packages() -> list[str]:
    """Every package folder under lmcache_pd/ (following the symlinked subpackages)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT / "lmcache_pd", followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in filenames:
            rel = Path(dirpath).relative_to(ROOT)
            out.append(".".join(rel.parts))
    return sorted(out)


def test_import_rules_hold() -> None:
    """`lint-imports` keeps every contract in pyproject's [tool.importlinter]."""
    exe = BIN / "lint-imports"
    if not exe.exists():
        pytest.fail(f"{exe} missing: install the dev extra (pip install -e '.[dev]')")
    res = subprocess.run(
        [str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "BROKEN" not in res.stdout and "KEPT" in res.stdout


def test_symlinked_subpackages_point_at_the_top_level_folders() -> None:
    for name in ("transports", "kernels", "router"):
        link = ROOT / "lmcache_pd" / name
        assert link.is_symlink(), f"{link} must be a symlink to ../{name}"
        assert link.resolve() == (ROOT / name).resolve()


def test_wheel_ships_and_imports_every_package(tmp_path: Path) -> None:
    """Build the wheel from a copy of the tree (the files git would commit) and import
    each package from the unpacked wheel alone: nothing missing, nothing from the tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    src = tmp_path / "src"
    for rel in listed:
        path = ROOT / rel
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            dest.symlink_to(os.readlink(path))
        elif path.is_file():
            shutil.copy2(path, dest)
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    (wheel,) = wheels.glob("lmcache_pd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    packages = _source_packages()
    assert {"lmcache_pd.router", "lmcache_pd.kernels", "lmcache_pd.transports"} <= set(packages)
    missing = [p for p in packages if p.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel: {missing}"
    light = [p for p in packages if not p.startswith("lmcache_pd.integration.vllm")]
    heavy = [p for p in packages if p.startswith("lmcache_pd.integration.vllm")]
    code = (
        "import importlib, sys\n"
        f"site = {str(tmp_path / 'site')!r}\n"
        "sys.path.insert(0, site)\n"
        "names = sys.argv[1:]\n"
        "for n in names:\n"
        "    m = importlib.import_module(n)\n"
        "    assert m.__file__.startswith(site), (n, m.__file__)\n"
        "print('imported', len(names))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    names = light + (heavy if importlib.util.find_spec("vllm") is not None else [])
    res = subprocess.run(
        [sys.executable, "-c", code, *names],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert f"imported {len(names)}" in res.stdout


def test_dtype_tables_agree() -> None:
    """The core's byte sizes and the kernels' torch dtypes name the same dtypes, with
    the same widths (the kernels cannot import the core's table, so this ties them)."""
    assert set(DTYPE_SIZES) == set(TORCH_DTYPES)
    for name, size in DTYPE_SIZES.items():
        assert TORCH_DTYPES[name].itemsize == size, name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_kernel_shape_of_a_layout_matches_it(name: str) -> None:
    layout = PRESETS[name]
    shape = KVShape.of(layout)
    assert shape.bytes_per_token == layout.bytes_per_token
    assert shape.chunk_shape(7) == layout.chunk_shape(7)
    assert shape.kv_factor == layout.kv_factor
    assert shape.attention == layout.attention.value
    assert KVShape.of(shape) is shape


def test_kernel_shape_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="dtype 'int4' is not supported"):
        KVShape(num_layers=1, num_kv_heads=1, head_size=8, block_size=16, dtype="int4")
    with pytest.raises(ValueError, match="head_size must be > 0"):
        KVShape(num_layers=1, num_kv_heads=1, head_size=0, block_size=16, dtype="float16")


def test_kernels_take_their_own_shape_as_well_as_a_layout() -> None:
    """The kernels need no core type: a KVShape drives gather/scatter exactly like the
    KVLayout it was made from."""
    layout = PRESETS["tiny"]
    shape = KVShape.of(layout)
    blocks, n = 4, layout.block_size
    caches = [
        torch.randn(2, blocks, n, layout.num_kv_heads, layout.head_size)
        for _ in range(layout.num_layers)
    ]
    slots = torch.tensor([3, 17, 40, 63], dtype=torch.int64)
    out_layout = torch.empty(4 * layout.bytes_per_token, dtype=torch.uint8)
    out_shape = torch.empty_like(out_layout)
    gather(caches, slots, out_layout, layout, PagedFormat.FLASH_ATTN)
    gather(caches, slots, out_shape, shape, PagedFormat.FLASH_ATTN)
    assert torch.equal(out_layout, out_shape)
    fresh = [torch.zeros_like(c) for c in caches]
    scatter(out_shape, fresh, slots, shape, PagedFormat.FLASH_ATTN)
    for c, f in zip(caches, fresh, strict=True):
        flat_c, flat_f = c.reshape(2, -1, *c.shape[3:]), f.reshape(2, -1, *f.shape[3:])
        assert torch.equal(flat_c[:, slots], flat_f[:, slots])
