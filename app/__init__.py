"""mediagate: one API key and one prepaid balance for image generation and LLM APIs."""
