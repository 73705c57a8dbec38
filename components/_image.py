from functools import partial

from kfp import dsl

from xrayops.config import get_settings

# Every stage runs the same image; kfp is inside it, so nothing is pip-installed at run time.
xrayops_component = partial(dsl.component, base_image=get_settings().image, install_kfp_package=False)
