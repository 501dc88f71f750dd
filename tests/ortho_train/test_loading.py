"""Model folders never run their own code: `trust_remote_code=False` everywhere a model, config or
tokenizer is read, so a folder with `auto_map` code is refused with a message, never executed, and
no "[y/N]" question waits on a terminal."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from ortho_train.models import load_causal_lm
from ortho_train.tokenization import load_tokenizer
for load in (load_causal_lm, load_tokenizer):
    try:
        load(sys.argv[1])
    except (ValueError, OSError) as error:
        print(load.__name__, "refused:", str(error).splitlines()[0][:200])
    else:
        print(load.__name__, "loaded")
"""


def test_a_folder_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path):
    folder = tmp_path / "remote_code_model"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(code)
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel",
                "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map, "tokenizer_class": "EvilTokenizer"}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # a terminal-less run with stdin open: an interactive question would hang until the timeout
    result = subprocess.run([sys.executable, "-c", PROBE, str(folder)], cwd=REPO, env=env, input="y\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("load_causal_lm refused:") for line in lines), result.stdout
    assert any(line.startswith("load_tokenizer refused:") for line in lines), result.stdout
    assert not marker.exists()
