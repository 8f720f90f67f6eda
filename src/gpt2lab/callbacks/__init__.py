"""Lightning callbacks of gpt2lab, one module each; configs name them by module path."""
