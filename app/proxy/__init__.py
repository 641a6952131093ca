"""The LLM API passthrough: OpenAI Chat and Responses, Anthropic Messages, Gemini; streamed, metered, one key."""
