"""External tensors under 1 MiB read with pread, larger ones mapped (their pages go with the array), and
tensors the output's data file holds read back (issue 20: reading 1600 external tensors of timm's
mobileone_s0 mapped each on its own and resolved its path each time: 0.2 s of a 0.5 s fold). A file
changed under the same name is read anew."""

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfold import InputError
from onnxfold.tensors import DataSink, read_tensor


def external(name: str, location: str, offset: int, array: np.ndarray) -> onnx.TensorProto:
    t = numpy_helper.from_array(array, name)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        t.external_data.add(key=key, value=value)
    return t


@pytest.mark.parametrize("rows", [3, 70000])  # read, and mapped (over 1 MiB)
def test_tensors_of_one_file_read_whole_and_a_rewritten_file_is_read_again(tmp_path, rows):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(rows, 4)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)
    (tmp_path / "w.data").write_bytes(a.tobytes() + b.tobytes())
    ta, tb = external("a", "w.data", 0, a), external("b", "w.data", a.nbytes, b)
    got_a, got_b = read_tensor(ta, tmp_path), read_tensor(tb, tmp_path)
    assert np.array_equal(got_a, a) and np.array_equal(got_b, b) and not got_a.flags.writeable
    # replaced under the same name (a new file, as a commit leaves it): the new values, not the old mapping's
    c = (a * -2).astype(np.float32)
    (tmp_path / "new.data").write_bytes(c.tobytes() + b.tobytes())
    os.replace(tmp_path / "new.data", tmp_path / "w.data")
    assert np.array_equal(read_tensor(ta, tmp_path), c)
    assert np.array_equal(got_a, a)  # an array read before keeps its values
    # rewritten in place, shorter: truncated is one line
    (tmp_path / "w.data").write_bytes(c.tobytes())
    with pytest.raises(InputError, match="truncated"):
        read_tensor(tb, tmp_path)


def test_a_location_outside_the_folder_is_refused_every_time(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "w.data").write_bytes(np.zeros(4, np.float32).tobytes())
    t = external("a", "../w.data", 0, np.zeros(4, np.float32))
    for _ in range(2):
        with pytest.raises(InputError, match="outside the model's folder"):
            read_tensor(t, tmp_path / "m")


@pytest.mark.parametrize("size", [16, (1 << 20) // 4 + 3])  # read (small) and mapped (from 1 MiB)
def test_a_tensor_the_sink_wrote_reads_back_whole(tmp_path, size):
    rng = np.random.default_rng(1)
    sink = DataSink(tmp_path / "out.data")
    try:
        first = rng.normal(size=7).astype(np.float32)
        value = rng.normal(size=size).astype(np.float32)
        for name, array in (("first", first), ("value", value)):
            t = sink.stream(name, array.shape, np.float32, [array])
        assert np.array_equal(sink.read(t), value)
    finally:
        sink.close()
