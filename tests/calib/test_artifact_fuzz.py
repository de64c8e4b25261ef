"""Fuzzing the .waps loader: any corruption of a valid artifact's bytes, or of its manifest,
either loads (and validates) or raises ArtifactError with one line — nothing else escapes."""
import io
import json
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calib import artifact
from calib.errors import ArtifactError


@pytest.fixture(scope="module")
def good_bytes(tiny_artifact, tmp_path_factory):
    path = artifact.save(tiny_artifact, tmp_path_factory.mktemp("f") / "good.waps")
    return path.read_bytes()


def _load(tmp_path, data: bytes):
    p = tmp_path / "fuzz.waps"
    p.write_bytes(data)
    try:
        artifact.load(p)
    except ArtifactError as e:
        assert str(e) and "\n" not in str(e)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(st.data())
def test_byte_mutations(good_bytes, tmp_path_factory, data):
    raw = bytearray(good_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    _load(tmp_path_factory.mktemp("m"), bytes(raw))


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                       | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                       max_leaves=6)


@SETTINGS
@given(st.data())
def test_manifest_mutations(good_bytes, tmp_path_factory, data):
    with zipfile.ZipFile(io.BytesIO(good_bytes)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    m = json.loads(members["manifest.json"])
    # replace one value somewhere in the manifest with arbitrary JSON
    path = []
    node = m
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    if path:
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = data.draw(JSONISH)
    else:
        m[data.draw(st.sampled_from(sorted(m)))] = data.draw(JSONISH)
    members["manifest.json"] = json.dumps(m).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    _load(tmp_path_factory.mktemp("j"), buf.getvalue())
