"""Sizes as people and Kubernetes write them: 1Gi, 500Mi, 10G, 4096."""

from .errors import InvalidArgument

_FACTORS = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
            "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def parse_size(text: str) -> int:
    text = text.strip()
    number = text.rstrip("KMGTikB")
    suffix = text[len(number):].removesuffix("B") if text.endswith("iB") else text[len(number):]
    # isascii: str.isdigit() also accepts "²" (int() then raises ValueError) and "٣".
    if not (number.isascii() and number.isdigit()) or suffix not in _FACTORS:
        raise InvalidArgument(f"{text!r} is not a size; write bytes or a number with "
                              f"Ki, Mi, Gi, Ti (or k, M, G, T)")
    return int(number) * _FACTORS[suffix]


def format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
