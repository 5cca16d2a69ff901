"""From a file to text: one loader, prompt building, sampling, generation, the prefix cache and
image prompts."""
