"""The start-up check of `data.micro_batch` (issue 26 item 4, `launch.batch_memory.check_micro_batch`): its
arithmetic against hand computations, the refusals as one line naming the key and the numbers, and the issue's
`data.micro_batch=100000000` refused on this machine (psutil's available memory)."""

from __future__ import annotations

import pytest

from core.errors import UserError
from launch.batch_memory import batches_in_flight, check_micro_batch

IN1K = (3, 224, 224)  # 150,528 values per image


def test_bytes_in_flight_by_hand():
    # 1000 x 150,528 uint8 = 150,528,000 bytes a batch; 4 workers x prefetch 2 = 8 batches; 2 processes: 16 batches
    assert check_micro_batch(1000, None, IN1K, 4, 2, ranks_per_host=2, available=10**12) == 2_408_448_000
    # float32: 4 bytes a value
    assert check_micro_batch(1000, None, IN1K, 4, 2, ranks_per_host=2, dtype="float32",
                             available=10**12) == 4 * 2_408_448_000
    # no workers: the one batch the process builds itself (prefetch does not apply)
    assert check_micro_batch(64, None, (3, 32, 32), 0, 2, ranks_per_host=1, available=10**12) == 64 * 3072
    assert batches_in_flight(0, 5) == 1 and batches_in_flight(3, 5) == 15


def test_memory_refusal_at_the_available_bytes():
    need = 2_408_448_000
    assert check_micro_batch(1000, None, IN1K, 4, 2, ranks_per_host=2, available=need) == need  # fits exactly
    with pytest.raises(UserError) as err:
        check_micro_batch(1000, None, IN1K, 4, 2, ranks_per_host=2, available=need - 1)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.micro_batch=1,000: ")
    assert "1,000 x 3x224x224 uint8 take 0.1 GiB each" in message  # 150,528,000 / 2**30 = 0.14
    assert "8 in flight per process (4 workers x prefetch 2) x 2 processes on this host need 2.2 GiB" in message
    assert "more than the 2.2 GiB of memory available" in message and "lower data.micro_batch" in message


def test_micro_batch_over_each_process_share_of_the_split():
    assert check_micro_batch(250, 1000, (3, 32, 32), 2, world_size=4, ranks_per_host=1, available=10**12) > 0
    with pytest.raises(UserError, match=r"^data\.micro_batch=251 is more than the split's 250 images for each of 4 "
                                        r"processes \(1,000 in all\); lower data\.micro_batch"):
        check_micro_batch(251, 1000, (3, 32, 32), 2, world_size=4, ranks_per_host=1, available=10**12)


def test_the_issue_value_is_refused_here():
    """`data.micro_batch=100000000` on the CIFAR sample (4,000 images) with 2 workers: refused for the split's size;
    with an unknown size, for memory (1e8 x 3,072 bytes x 4 batches = 1.1 TiB, more than this machine has)."""
    with pytest.raises(UserError, match="more than the split's 4,000 images"):
        check_micro_batch(100_000_000, 4000, (3, 32, 32), 2)
    with pytest.raises(UserError, match=r"data\.micro_batch=100,000,000: .* need 1,144\.4 GiB, more than the"):
        check_micro_batch(100_000_000, None, (3, 32, 32), 2, ranks_per_host=1)
