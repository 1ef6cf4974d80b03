"""Small pieces shared by the engine, the offline tool and the command line: precision rule, crash-safe
writing, progress lines, message grammar, warnings that point at user code. Torch-light: no engine import."""
