"""Dataset -> chunks: read and validate dataset files, render prompts, price a run before it spends."""
