"""Core helpers every layer may use: params (the typed schema), errors, atomic writes, the quiet console."""
