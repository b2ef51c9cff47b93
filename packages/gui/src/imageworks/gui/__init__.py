"""ImageWorks operator console (Streamlit). Talks to the chat proxy over HTTP only."""
