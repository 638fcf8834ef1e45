"""The report: a Streamlit app and a static export over benchmark result files and Optuna studies.
It reads files and storage only; it imports neither the engine nor the kernels."""
