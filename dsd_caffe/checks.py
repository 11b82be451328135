"""Value checks shared by every module: counts and positive finite numbers, each refused as a UserError naming
the value. Pure Python (no Caffe import)."""
import math
import numbers
import struct

from .errors import UserError

#: The largest integer Caffe takes for a count or a seed: its solver fields (max_iter, snapshot, iter_size,
#: test_iter, ...) and ``caffe test --iterations`` are int32, and its RNG seed an unsigned int.
INT_MAX = 2**31 - 1


def count(value, what, minimum=1, maximum=INT_MAX):
    """``value`` as an int if it is an integer (a numpy one too, never a bool) in ``minimum``..``maximum`` (None:
    no maximum), else UserError naming ``what`` (a field's name: the tools print its flag)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}, got {value!r}", fields=[what])
    if maximum is not None and value > maximum:
        raise UserError(f"{what} must be at most {maximum} (Caffe's int32), got {value!r}", fields=[what])
    return int(value)


def positive(value, what, float32=False):
    """``value`` as a float if it is a positive finite number, else UserError naming ``what`` (a field); with
    ``float32`` also one that Caffe's float field keeps positive and finite (not above 3.4e38, not rounded to 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserError(f"{what} must be a positive finite number, got {value!r}", fields=[what])
    if float32:
        try:
            single = struct.unpack("f", struct.pack("f", value))[0]
        except OverflowError:
            single = math.inf
        if not 0 < single < math.inf:
            raise UserError(f"{what} must be a positive number that Caffe's float holds (about 1.4e-45 to "
                            f"3.4e38), got {value!r}", fields=[what])
    return float(value)
