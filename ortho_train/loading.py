"""How every model, config and tokenizer is read: from local files only, never running code that a
model folder brings (`trust_remote_code=False` said explicitly: left unset, transformers asks
"[y/N]" on a terminal before running a folder's `auto_map` code, and a run would wait for an answer)."""

LOCAL_FILES_ONLY = {"local_files_only": True, "trust_remote_code": False}
