"""The pages of `cube ui`, one module per concern, each with its own APIRouter."""
