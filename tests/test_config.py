"""KVCacheConfig validation: every bad value raises InvalidArgumentError with
a message naming the field."""

import numpy as np
import pytest

from hstu_kvcache import InvalidArgumentError, KVCacheConfig, KVCacheError

torch = pytest.importorskip("torch")


def base(**kw):
    args = dict(num_layers=2, num_heads=2, head_dim=8, num_pages=16)
    args.update(kw)
    return KVCacheConfig(**args)


@pytest.mark.parametrize("field,value,needle", [
    ("num_layers", 0, "num_layers"),
    ("num_layers", 2000, "num_layers"),
    ("num_heads", -1, "num_heads"),
    ("head_dim", 0, "head_dim"),
    ("num_pages", 0, "num_pages"),
    ("page_size", 3, "power of two"),
    ("page_size", 1, "page_size"),
    ("page_size", 512, "page_size"),
    ("dtype", "int8", "dtype"),
    ("dtype", torch.int32, "dtype"),
    ("device", "tpu", "device"),
    ("device", "cuda:x", "device"),
    ("max_batch_size", 0, "max_batch_size"),
    ("max_seq_len", 0, "max_seq_len"),
    ("max_batch_tokens", 0, "max_batch_tokens"),
    ("verify_tokens", 1, "verify_tokens"),
    ("num_layers", 2.5, "integer"),
    ("num_layers", True, "integer"),
    ("max_open_batches", 0, "max_open_batches"),
])
def test_bad_values_raise(field, value, needle):
    with pytest.raises(InvalidArgumentError, match=needle) as e:
        base(**{field: value})
    assert isinstance(e.value, KVCacheError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("dtype,name", [
    ("float32", "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
    (np.float32, "float32"), (np.dtype("float16"), "float16"), ("bf16", "bfloat16"),
])
def test_dtype_forms(dtype, name):
    assert base(dtype=dtype).dtype == name


@pytest.mark.parametrize("device,norm", [
    ("cpu", "cpu"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"), (torch.device("cpu"), "cpu"),
    (torch.device("cuda", 2), "cuda:2"),
])
def test_device_forms(device, norm):
    assert base(device=device).device == norm


def test_sizes():
    cfg = base(page_size=4, dtype="bfloat16")
    assert cfg.element_size == 2
    assert cfg.page_bytes == 2 * 4 * 2 * 8 * 2
    assert cfg.table_bytes == 2 * 16 * cfg.page_bytes
    assert cfg.max_tokens == 64
    assert np.int64(3) and base(num_layers=np.int64(3)).num_layers == 3
