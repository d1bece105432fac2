"""Task heads, long-document strategies, dataset adapters and metrics for legal and clinical fine-tuning."""
