"""Synthetic demo data in the real on-disk formats of the three sources (WBC, PRCC, CAM16).

`generate_demo_data(out, seed, small)` writes the whole set; `ensure_demo_data` adds caching and an
atomic rename; `formats` holds the reusable slide/annotation writers.
"""

from .formats import read_asap_xml, write_asap_xml, write_pyramidal_tiff
from .generate import (
    DEMO_VERSION,
    DemoConfig,
    DemoSpec,
    demo_paths,
    ensure_demo_data,
    generate_demo_data,
    make_demo_data,
)
from .wbc import CLASSES

__all__ = ["CLASSES", "DEMO_VERSION", "DemoConfig", "DemoSpec", "demo_paths", "ensure_demo_data",
           "generate_demo_data", "make_demo_data", "read_asap_xml", "write_asap_xml", "write_pyramidal_tiff"]
