"""The installable package: what the wheel holds, what `import fastsiglip` pulls in, and that a
model runs on a machine without CUDA.

The kernels live in the repository's kernels/ folder and install as `fastsiglip.kernels`; they
must never become a top-level `kernels` module, which Hugging Face's `kernels` package owns
and transformers probes for (`is_kernels_available()`). Each import check runs in a fresh
interpreter with cwd outside the repository, as a user's would.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "fastsiglip", "kernels")  # what a wheel build reads


def run_python(code: str, cwd, **env) -> str:
    """Run `code` in a fresh interpreter (no TRITON_INTERPRET: a user's environment); its stdout."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _build_backend_site(folder: pathlib.Path) -> pathlib.Path | None:
    """A site folder holding only the build backend, linked from this environment: setuptools (and
    `wheel`, which setuptools before 70.1 needs to build wheels). None if setuptools is missing.

    The build then runs as `python -I -S` with this folder as its one site directory: pip's build
    isolation without a download. Nothing else installed here takes part (Hugging Face's `kernels`
    registers a setuptools `egg_info.writers` entry point, `kernels._internals.locking`, that every
    build in its environment would import), and the source's own kernels/ folder is never on
    sys.path (-I: not the working directory), so no top-level `kernels` can disturb the build."""
    import importlib.metadata

    folder.mkdir()
    for name in ("setuptools", "wheel"):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "setuptools":
                return None
            continue
        site = pathlib.Path(dist.locate_file(""))
        tops = {pathlib.PurePath(f).parts[0] for f in dist.files or ()}
        for top in sorted(tops - {"..", "__pycache__"}):
            if not top.endswith(".pth") and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    return folder


def _can_build_wheels(site: pathlib.Path) -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the `wheel` package."""
    return (site / "setuptools" / "command" / "bdist_wheel.py").exists() or (site / "wheel").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel of a copy of the sources (a build writes build/ and *.egg-info next to
    pyproject.toml; the checkout stays untouched), built in an isolated environment: setuptools'
    PEP 517 backend with only setuptools importable (_build_backend_site: fast, offline), else
    `pip wheel`, whose build isolation installs setuptools into a fresh environment."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    site = _build_backend_site(tmp_path_factory.mktemp("build-env") / "site")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    if site is not None and _can_build_wheels(site):
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from setuptools import build_meta; "
                "build_meta.build_wheel(sys.argv[2])")
        command = [sys.executable, "-I", "-S", "-c", code, str(site), str(out)]
    else:
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)]
    proc = subprocess.run(command, cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"wheel build failed ({' '.join(command)}):\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("fastsiglip-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {[w.name for w in out.iterdir()]}"
    return zipfile.ZipFile(wheels[0])


def test_wheel_top_level_is_only_fastsiglip(wheel):
    top_level = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    assert len(top_level) == 1, f"no (or several) top_level.txt in {wheel.namelist()}"
    assert wheel.read(top_level[0]).decode().split() == ["fastsiglip"]
    roots = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"fastsiglip"}, f"the wheel installs top-level names {sorted(roots)}"


def test_wheel_holds_the_kernels_as_fastsiglip_kernels(wheel):
    names = set(wheel.namelist())
    kernel_files = {f"fastsiglip/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert "fastsiglip/kernels/__init__.py" in kernel_files
    assert kernel_files <= names, f"missing from the wheel: {sorted(kernel_files - names)}"
    package_files = {f"fastsiglip/{p.name}" for p in (ROOT / "fastsiglip").glob("*.py")}
    assert package_files <= names, f"missing from the wheel: {sorted(package_files - names)}"
    assert not any(n.startswith("kernels/") for n in names)


# Where a top-level `kernels` module would come from, as seen from a user's interpreter: None,
# or the origin of Hugging Face's package if it is installed (transformers 5.25 requires it).
KERNELS_ORIGIN = textwrap.dedent("""
    import importlib.util
    def kernels_origin():
        spec = importlib.util.find_spec("kernels")
        return None if spec is None else spec.origin
""")


def test_import_needs_neither_triton_nor_transformers(tmp_path):
    """`import fastsiglip` imports neither, and leaves a top-level `kernels` as it found it: absent
    stays absent, Hugging Face's stays Hugging Face's, never imported (and never ours)."""
    out = run_python(KERNELS_ORIGIN + textwrap.dedent("""
        import json, sys
        before = kernels_origin()
        import fastsiglip
        print(json.dumps({"imported": sorted(m for m in ("triton", "transformers", "kernels") if m in sys.modules),
                          "before": before, "after": kernels_origin()}))
    """), cwd=tmp_path)
    seen = json.loads(out)
    assert seen["imported"] == [], f"import fastsiglip imported {seen['imported']}"
    assert seen["after"] == seen["before"], f"a top-level `kernels` moved from {seen['before']} to {seen['after']}"
    _assert_not_ours(seen["after"])


def _assert_not_ours(origin):
    """A top-level `kernels`, if any, is not the repository's kernels/ (nor an installed copy of it)."""
    if origin is not None:
        import importlib.util

        ours = {(ROOT / "kernels").resolve(),
                *(pathlib.Path(p).resolve() for p in importlib.util.find_spec("fastsiglip.kernels").submodule_search_locations)}
        assert pathlib.Path(origin).resolve().parent not in ours, f"fastsiglip's kernels are importable as `kernels`: {origin}"


def test_transformers_is_kernels_available_unchanged(tmp_path):
    """transformers' is_kernels_available() answers the same before and after fastsiglip and its
    kernels are imported (whatever it answers: Hugging Face's `kernels` is not ours to add or hide)."""
    pytest.importorskip("transformers")
    out = run_python(KERNELS_ORIGIN + textwrap.dedent("""
        import json
        from transformers.utils import is_kernels_available
        before, origin_before = is_kernels_available(), kernels_origin()
        import fastsiglip, fastsiglip.kernels  # the kernels package too, as a GPU run imports it
        is_kernels_available.cache_clear()
        print(json.dumps({"before": before, "after": is_kernels_available(), "origin_before": origin_before,
                          "origin_after": kernels_origin()}))
    """), cwd=tmp_path)
    seen = json.loads(out)
    assert seen["after"] == seen["before"], seen
    assert seen["origin_after"] == seen["origin_before"], seen
    _assert_not_ours(seen["origin_after"])


def test_forward_without_cuda_uses_the_reference(tmp_path):
    """FASTSIGLIP_IMPL=auto on a machine without CUDA: the reference ops, triton never imported,
    the same numbers as FASTSIGLIP_IMPL=reference."""
    out = run_python("""
        import os, sys
        import torch
        from fastsiglip import build, config

        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        for naflex in (False, True):
            vision = config.VisionConfig(**tower, patch_size=4, image_size=16, num_patches=16, naflex=naflex)
            cfg = config.ModelConfig("siglip2" if naflex else "siglip", "SiglipModel", vision,
                                     config.TextConfig(**tower, vocab_size=50, max_position_embeddings=8))
            torch.manual_seed(0)
            model = build(cfg).eval()
            if naflex:
                pixels = dict(pixel_values=torch.randn(2, 16, 48), spatial_shapes=torch.tensor([[4, 4], [2, 3]]),
                              pixel_attention_mask=(torch.arange(16) < torch.tensor([[16], [6]])).long())
            else:
                pixels = dict(pixel_values=torch.randn(2, 3, 16, 16))
            inputs = dict(pixels, input_ids=torch.randint(0, 50, (2, 8)), return_loss=True)
            with torch.no_grad():
                os.environ["FASTSIGLIP_IMPL"] = "auto"
                auto = model(**inputs)
                os.environ["FASTSIGLIP_IMPL"] = "reference"
                ref = model(**inputs)
            assert torch.isfinite(auto.logits_per_image).all() and torch.isfinite(auto.loss)
            assert torch.equal(auto.logits_per_image, ref.logits_per_image) and torch.equal(auto.loss, ref.loss)
        print("triton" in sys.modules)
    """, cwd=tmp_path, CUDA_VISIBLE_DEVICES="", FASTSIGLIP_IMPL="auto")
    assert out.split() == ["False"], "the CPU forward imported triton"
