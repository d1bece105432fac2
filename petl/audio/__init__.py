"""Audio-spectrogram transformer fine-tuning: audio data pipeline, datasets and the audio runner."""
