"""Study reports: collect saved runs, aggregate over seeds, render Markdown and self-contained HTML."""
