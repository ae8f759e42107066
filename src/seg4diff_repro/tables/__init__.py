"""Tables for paper_tables/: our numbers beside the paper's, with provenance."""
