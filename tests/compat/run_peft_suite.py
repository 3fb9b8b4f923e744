"""PEFT's own tests of weighted adapter merging with our drop-in installed (CI's compatibility check).

Runs tests of PEFT 0.21.2's source distribution (pinned by version and sha256 below; the installed
PEFT is the same 0.21.2, from .ci/setup) with ``dppa_kernels.integrations.peft.install()`` active
for the whole session, under the rule of ``host_suite.py``: every test passes wherever it passes
without ``install()``. Its test dependencies beyond ours, ``diffusers`` and ``parameterized``, are
installed by .ci/setup (its ``testing_common.py`` imports them).

Selection (``-k``): the tests that call ``add_weighted_adapter``, which is where PEFT itself calls
the merge functions our ``install()`` replaces (``task_arithmetic``, ``ties``, ``dare_linear``,
``dare_ties``, ``magnitude_prune`` and their ``_svd`` variants, via ``peft.tuners.lora.model``), in
every test file that has such tests. The full suite (about 33,000 cases, most on hub models) takes
far longer than CI allows, and ``install()`` changes nothing else in PEFT.

* ``test_custom_models.py``: 67 cases on models built in the test (MLPs): ties, dare_ties,
  dare_linear, magnitude_prune, linear, svd and cat variants with positive, negative, mixed and zero
  weights, modules_to_save handling and the errors ``add_weighted_adapter`` raises. One of them
  loads ``bert-base-uncased`` and is excluded while running.
* ``test_decoder_models.py``, ``test_encoder_decoder_models.py``,
  ``test_feature_extraction_models.py``, ``test_target_parameters.py``, ``test_stablediffusion.py``:
  their weighted-combination tests all run on hub models (``hf-internal-testing/...``) and are
  excluded at collection unless the model is in the local Hugging Face cache.
* Not collected: ``test_torch_compile.py`` (skips itself unless PEFT_DEBUG_WITH_TORCH_COMPILE=1, and
  its models come from the hub) and ``test_arrow.py`` (its one test the ``-k`` matches checks
  ``merge_and_unload`` on a hub model, not weighted adapters). PEFT has no tests of ``peft.utils.merge_utils``'s functions called
  directly; ours are in tests/test_integration_peft.py.

The sdist has no ``conftest.py`` and its pytest options (coverage, warnings as errors for
transformers) live in its ``pyproject.toml``, which is not used: only the tests are unpacked.

Usage: ``python tests/compat/run_peft_suite.py [--fetch-only] [--control-all] [pytest args]``.
"""

import sys

from host_suite import Host, check

FILES = ("test_custom_models.py", "test_decoder_models.py", "test_encoder_decoder_models.py",
         "test_feature_extraction_models.py", "test_target_parameters.py", "test_stablediffusion.py")
SELECTION = "add_weighted_adapter or weighted_combination or merging_adapters"

PEFT = Host(name="peft", dist="peft", version="0.21.2",
            sha256="b803ccfb3f3f316004d850284306687833a2235ea278fb56abc856203456142e",
            sdist="peft-0.21.2.tar.gz", args=(*(f"tests/{f}" for f in FILES), "-k", SELECTION), package=True)

if __name__ == "__main__":
    sys.exit(check(PEFT, sys.argv[1:]))
