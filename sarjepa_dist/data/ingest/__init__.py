"""Turn images, array stacks or large scenes into chip shards (``data/shards.py``).

Three front doors, one policy (``core``):

* ``ingest_images`` (``images.py``): a class-per-folder tree (``SRC/<CLASS>/*.png|jpg|tif``) →
  labelled chips, every one centre-cropped (or reflection-padded) to ``size × size``. MSTAR chips
  differ in size by class, so without one crop size the chip size alone gives the label away
  (METHOD.md §5).
* ``ingest_arrays`` (``arrays.py``): ``.npy``/``.npz`` stacks (N×H×W or N×C×H×W), optionally with labels.
* ``ingest_scene`` (``scene.py``): a big scene (TIFF/GeoTIFF or ``.npy``, magnitude or complex SLC)
  → unlabelled ``tile × tile`` chips at ``stride``, skipping no-data tiles.

Each lists its inputs, decodes and checks them, and hands the good chips to ``core.commit_chips``.
Bad inputs (unreadable or truncated files, NaN/Inf, negative amplitudes, all-zero chips, wrong
dimensions) never stop an ingest on their own: each is logged with its file name and listed in the
manifest's ``quarantine`` with a reason. Only when the bad fraction exceeds ``max_bad_fraction``
does the ingest fail (``IngestError``) - and then nothing is committed, so the previous dataset at
``DEST`` stays intact and readable (``ShardWriter`` writes a new ``data-<version>/`` folder and
swaps ``manifest.json`` last).

Values are never rescaled: a chip keeps its source dtype (uint8 / uint16 / float32). When one
source mixes dtypes the dataset takes the narrowest dtype that holds all of them exactly
(uint8 ⊂ uint16 ⊂ float32) and the manifest's ``stats.source_dtypes`` records the mix.
"""

from sarjepa_dist.data.ingest.arrays import ARRAY_EXTENSIONS, ingest_arrays
from sarjepa_dist.data.ingest.core import (
    IngestError, IngestReport, center_crop_or_pad, min_paddable_side, promote_dtypes, storage_dtype, to_storage,
)
from sarjepa_dist.data.ingest.images import IMAGE_EXTENSIONS, decode_image, ingest_images
from sarjepa_dist.data.ingest.scene import SCENE_EXTENSIONS, ingest_scene
from sarjepa_dist.data.shards import BadChip

__all__ = [
    "ARRAY_EXTENSIONS", "IMAGE_EXTENSIONS", "SCENE_EXTENSIONS", "BadChip", "IngestError", "IngestReport",
    "center_crop_or_pad", "decode_image", "ingest_arrays", "ingest_images", "ingest_scene", "min_paddable_side",
    "promote_dtypes", "storage_dtype", "to_storage",
]
