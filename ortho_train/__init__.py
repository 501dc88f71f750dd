"""ortho-train: plant, measure, separate and remove memorisation in language models."""
from ortho_train.import_names import install as _install_import_names

_install_import_names()  # `ortho_kernels` is the kernels/ folder; `kernels` never is (bitsandbytes imports that name)
