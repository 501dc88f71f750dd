"""ortho-train: plant, measure, separate and remove memorisation in language models."""
from ortho_train.checkout import add_checkout_folders

add_checkout_folders()  # a checkout used without installing: `ortho_kernels`, `ortho_callbacks`
